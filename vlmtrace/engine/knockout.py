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

`attention="cross"` knocks out cross-attention instead (BLIP: question tokens reading image
patches; the answer decoder reading the question; Mllama: text tokens reading the image tiles'
patches; T5's decoder reading the encoded prompt). Query sides are positions of the stack's
own sequence; key sides are positions of what it cross-attends to: "image" means every
image patch (a function may pick some, e.g. one tile's), and for a decoder that reads the
prompt, prompt segments ("question", "visual"). Where only some layers cross-attend (Mllama),
a window cuts edges at those of its layers that do, and a cell centred on a layer that does
not is NaN, as a patching cell on a layer without its site: it would cut nothing.

A block that blocks nothing for some sample (a side with no positions) is an error: a
knockout that cuts no edge would report an unchanged probability as "no information flows".
What each block blocked is stored per sample (`blocked_positions`), so a reader can check that
"object->question" blocked a few patches and not the whole image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..errors import UserError
from ..models.load import VLM
from ..presentation.progress import progress_bar
from ..results.dataset import describe, provenance, sample_ids
from .admission import check_arguments, check_samples
from .corruptions import clean_side
from .forward import SEQUENCE_FIELDS, Edits, forward_plan, run_plans, shared_images, stack_rows
from .grouping import RequestPacer
from .inputs import scored_answer_ids
from .metrics import Metric, Probability
from .positions import Segments
from .sites import GridError, window_layers

ALL_KEYS = -1
"""Key index meaning every key position (every image patch of a cross-attention)."""

PositionSet = str | Sequence[str] | Callable[[Sample, Segments], Sequence[int]]

DEFAULT_BLOCKS: dict[str, tuple[PositionSet, PositionSet]] = {
    "image->question": ("image", "question"),
    "image->last": ("image", "last"),
    "question->last": ("question", "last"),
}


class EmptyBlockError(UserError):
    """A knockout block with no positions on one side: it would cut no attention edge."""


def resolve(side: PositionSet, sample: Sample, segments: Segments | None) -> list[int]:
    """Positions of one side of a block (`segments` None: the side is every image patch)."""
    if callable(side):
        return [int(p) for p in side(sample, segments)]
    names = (side,) if isinstance(side, str) else tuple(side)
    if segments is None:
        if names != ("image",):
            raise UserError(f"cross-attention keys here are image patches: name them 'image', not {side!r}.")
        return [ALL_KEYS]
    return [p for name in names if name in segments.names for p in segments.positions(name)]


def block_sides(
    blocks: Mapping[str, tuple[PositionSet, PositionSet]],
    sample: Sample,
    queries_in: Segments,
    keys_in: Segments | None,
) -> dict[str, tuple[list[int], list[int]]]:
    """(key positions, query positions) of every block for one sample; refuses empty sides."""
    sides = {}
    for name, (keys, queries) in blocks.items():
        key_positions = resolve(keys, sample, keys_in)
        query_positions = resolve(queries, sample, queries_in)
        for role, side, found in (("key", keys, key_positions), ("query", queries, query_positions)):
            if not found:
                present = list(queries_in.names if role == "query" or keys_in is None else keys_in.names)
                raise EmptyBlockError(
                    f"knockout block {name!r} blocks nothing for sample {sample.id!r}: its {role} side "
                    f"{_describe(side)!r} has no positions (this prompt has {present}). Give the "
                    "sample that segment (e.g. object regions from the data set's annotations) or "
                    "drop the block."
                )
        sides[name] = (key_positions, query_positions)
    return sides


def knockout(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    blocks: Mapping[str, tuple[PositionSet, PositionSet]] = DEFAULT_BLOCKS,
    windows: Sequence[int] = (1,),
    layers: Sequence[int] | None = None,
    stack: str | None = None,
    attention: str = "self",
    metric: Metric = Probability(),
    max_batch: int = 64,
    progress: bool = True,
    recipe: str = "",
    backend: Any = None,
) -> xr.Dataset:
    """The metric with attention K -> Q blocked, per (sample, block, window, layer)."""
    check_arguments(metric=metric, max_batch=max_batch)
    check_samples(vlm, samples)
    if not samples:
        raise ValueError("no samples for attention knockout: the data set is empty.")
    stack_name = stack or vlm.adapter.default_stack
    if stack_name not in vlm.adapter.stacks:
        raise UserError(f"{vlm.name} has no stack {stack_name!r}; it has {list(vlm.adapter.stacks)}.")
    the_stack = vlm.adapter.stacks[stack_name]
    if attention not in ("self", "cross"):
        raise UserError(f"attention must be 'self' or 'cross', not {attention!r}.")
    if attention == "cross" and the_stack.cross_attention is None:
        raise UserError(f"{vlm.name}'s {stack_name!r} stack has no cross-attention to knock out.")
    n_layers = vlm.shape.layers[stack_name]
    for size in windows:
        if not 1 <= size <= n_layers:
            raise GridError(f"window {size} does not fit {n_layers} layers; use 1..{n_layers}.")
    centres = list(layers) if layers is not None else list(range(n_layers))
    for centre in centres:
        if not 0 <= centre < n_layers:
            raise GridError(f"layer {centre} is out of range 0..{n_layers - 1}.")
    names = list(blocks)
    knockable = set(range(n_layers))
    if attention == "cross":
        knockable = set(vlm.shape.cross_attention_layers[stack_name])
    cells = [(b, w, c) for b in names for w in windows for c in centres if c in knockable]
    if not cells:
        raise GridError(
            f"none of the layers {centres} has cross-attention; {vlm.name}'s {stack_name!r} stack "
            f"cross-attends at layers {sorted(knockable)}."
        )
    values = np.full((len(samples), len(names), len(windows), len(centres)), np.nan)
    clean = np.full(len(samples), np.nan)
    per_chunk = max(1, max_batch - 1)
    blocked: list[tuple[dict[str, tuple[list[int], list[int]]], Segments, Segments | None]] = []
    pacer = RequestPacer(backend)

    def planned():
        """(sample, its chunk of cells, the planned forward), sample by sample: forwards of
        several samples may share a remote request."""
        for s, sample in enumerate(samples):
            answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=False)
            encoded = clean_side(vlm, sample, answer)
            queries_in = encoded.segments(the_stack.sequence)
            keys_in: Segments | None = queries_in
            if attention == "cross":
                keys_in = None if the_stack.cross_sequence == "image" else encoded.segments("prompt")
            sides = block_sides(blocks, sample, queries_in, keys_in)
            blocked.append((sides, queries_in, keys_in))
            widths = {
                sequence: len(encoded.inputs[ids])
                for sequence, (ids, _) in SEQUENCE_FIELDS.items()
                if ids in encoded.inputs
            }
            answer_at = (
                slice(0, len(answer)) if the_stack.sequence == "decoder" else slice(-len(answer), None)
            )
            if vlm.adapter.answer_sequence == "decoder":
                answer_at = slice(0, len(answer))
            for start in range(0, len(cells), per_chunk):
                chunk = cells[start : start + per_chunk]
                edits = Edits()
                for offset, (b, w, c) in enumerate(chunk):
                    keys, queries = sides[b]
                    for layer in (i for i in window_layers(c, w, n_layers) if i in knockable):
                        index = edits.knock(layer, cross=attention == "cross")
                        for q in queries:
                            for k in keys:
                                index.row.append(1 + offset)
                                index.query.append(q)
                                index.key.append(k)
                rows = [encoded.inputs] * (1 + len(chunk))
                images = shared_images(vlm, rows, the_stack, edits)
                batch = stack_rows(vlm, rows, widths, images)
                plan = forward_plan(
                    vlm,
                    the_stack,
                    batch,
                    edits,
                    metric=metric,
                    answer=torch.tensor(answer),
                    foil=None,
                    answer_slice=answer_at,
                    images=images,
                )
                yield s, chunk, plan

    with progress_bar(progress, f"knockout {vlm.name}") as bar:
        task = bar.add_task("cells", total=len(samples) * len(cells))
        forwards = planned()
        while group := list(islice(forwards, pacer.size)):  # one remote request per group
            started = time.monotonic()
            results = run_plans(vlm, [plan for _, _, plan in group], backend)
            pacer.ran(len(group), time.monotonic() - started)
            for (s, chunk, _), (out, _) in zip(group, results, strict=True):
                clean[s] = float(out[0])
                for (b, w, c), value in zip(chunk, out[1:].tolist(), strict=True):
                    values[s, names.index(b), list(windows).index(w), centres.index(c)] = value
                bar.advance(task, len(chunk))
    attrs = provenance(
        vlm,
        recipe=recipe,
        experiment="knockout",
        stack=stack_name,
        attention=attention,
        metric=metric.name,
        blocks={b: [_describe(k), _describe(q)] for b, (k, q) in blocks.items()},
    )
    positions, position_coords = blocked_positions(names, blocked)
    if blocked[0][2] is None:  # keys are image patches read by cross-attention
        attrs["blocked_keys"] = "every image patch (cross-attention keys; no key_blocked is stored)"
    return describe(
        xr.Dataset(
            {
                "knockout": (["sample", "block", "window", "layer"], values),
                "clean": (["sample"], clean),
                **positions,
            },
            coords={
                "sample": sample_ids(samples),
                "block": names,
                "window": list(windows),
                "layer": centres,
                **position_coords,
            },
            attrs=attrs,
        )
    )


def blocked_positions(
    names: Sequence[str],
    blocked: Sequence[tuple[Mapping[str, tuple[list[int], list[int]]], Segments, Segments | None]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data variables, coordinates): the positions each block blocked, per sample, as boolean masks.

    `query_blocked` (sample, block, query_position) marks the query positions of the stack's own
    sequence, `key_blocked` (sample, block, key_position) the key positions of the sequence it
    attends to; positions count from the start of each sample's sequence, and the per-sample
    coordinates `query_label` / `key_label` name each position's segment ("" past its end).
    Keys that are every image patch of a cross-attention have no token positions: no `key_blocked`.
    """
    variables: dict[str, Any] = {}
    coordinates: dict[str, Any] = {}
    for role, side in (("query", 1), ("key", 0)):
        sequences = [entry[2] if role == "key" else entry[1] for entry in blocked]
        if any(sequence is None for sequence in sequences):  # every image patch: no token positions
            continue
        width = max(len(sequence) for sequence in sequences)
        mask = np.zeros((len(blocked), len(names), width), dtype=bool)
        labels = np.full((len(blocked), width), "", dtype=object)  # objects: see results.dataset, Format
        for s, ((sides, *_), sequence) in enumerate(zip(blocked, sequences, strict=True)):
            labels[s, : len(sequence)] = sequence.labels
            for b, name in enumerate(names):
                mask[s, b, sides[name][side]] = True
        dim = f"{role}_position"
        variables[f"{role}_blocked"] = (
            ["sample", "block", dim],
            mask,
            {
                "description": f"True at the {role} positions the block cut (positions of the sample's own "
                f"{'sequence' if role == 'query' else 'key sequence'}, from its start)",
                "units": "boolean",
            },
        )
        coordinates[dim] = np.arange(width)
        coordinates[f"{role}_label"] = (["sample", dim], labels)
    return variables, coordinates


def _describe(side: PositionSet) -> str:
    if callable(side):
        return getattr(side, "__name__", "positions")
    return side if isinstance(side, str) else "+".join(side)
