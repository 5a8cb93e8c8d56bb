"""From samples to planned work: both sides of each sample encoded, its cells, how positions align.

Exact patching (`vlmtrace.engine.sweep`) and attribution patching (`vlmtrace.engine.attribution`) plan the
same way and lay results out identically, so they share this module and neither imports the
other's machinery.

    prepared = prepare(vlm, sample, ReplaceSpan("visual"), Probability(), whole_answer=False)
    sample_plan = plan(vlm, "lm", prepared, Grid(sites=("mlp",)))
    sample_plan.work            # indices of the cells that have positions to patch
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xarray as xr

from ..data.sample import Sample
from ..models.adapter import Stack
from ..models.load import VLM
from ..results.dataset import Layout, patching_attrs
from ..results.store import config_hash
from . import admission
from .alignment import align
from .corruptions import Corruption, Pair
from .forward import SEQUENCE_FIELDS, Edits, NoisePlan
from .inputs import scored_answer_ids
from .metrics import Metric
from .sites import Cell, Grid

Direction = Literal["denoise", "noise"]


@dataclass
class Plan:
    """One sample's work: its cells, which of them can be patched, and how positions align."""

    prepared: Prepared
    cells: list[Cell]
    work: list[int]
    """Indices of cells that have positions to patch (others stay NaN), in execution order."""
    aligned: dict[int, int]
    """Clean position -> corrupted position (`vlmtrace.engine.alignment`: paired by content)."""
    unpaired: dict[int, str]
    """Clean position -> why no corrupted position pairs with it (its cells stay NaN)."""


@dataclass
class Prepared:
    """A sample made ready for batching: its pair, answer ids and padding widths."""

    sample: Sample
    pair: Pair
    answer: torch.Tensor
    foil: torch.Tensor | None
    widths: dict[str, int]

    @property
    def baseline_rows(self) -> int:
        return 1 + self.pair.samples

    def pad(self, side: str, sequence: str) -> int:
        """Left padding of the clean or corrupted row in `sequence`."""
        encoded = self.pair.clean if side == "clean" else self.pair.corrupt
        return self.widths[sequence] - len(encoded.inputs[SEQUENCE_FIELDS[sequence][0]])

    def rows(self, inputs: Sequence[str]) -> list[dict]:
        encoded = {"clean": self.pair.clean, "corrupt": self.pair.corrupt}
        return [encoded[side].inputs for side in inputs]

    def answer_slice(self, vlm: VLM) -> slice:
        n = len(self.answer)
        return slice(0, n) if vlm.adapter.answer_sequence == "decoder" else slice(-n, None)


def prepare(vlm: VLM, sample: Sample, corruption: Corruption, metric: Metric, whole_answer: bool) -> Prepared:
    """Encode both sides of a sample and the ids the metric scores."""
    if whole_answer and not metric.whole_answer_ok:
        raise ValueError(f"the {metric.name} metric scores first tokens only; use whole_answer=False.")
    answer = scored_answer_ids(vlm, sample.prompt, sample.answer, whole=whole_answer)
    foil = None
    if metric.needs_foil:
        if not sample.foil:
            raise ValueError(
                f"the {metric.name} metric needs a foil answer, but sample {sample.id!r} has none: "
                "set Sample.foil (usually the answer on the corrupted side)."
            )
        foil = torch.tensor(scored_answer_ids(vlm, sample.prompt, sample.foil, whole=False))
    pair = corruption.pair(vlm, sample, answer)
    widths = {
        sequence: max(len(pair.clean.inputs[ids]), len(pair.corrupt.inputs[ids]))
        for sequence, (ids, _) in SEQUENCE_FIELDS.items()
        if ids in pair.clean.inputs
    }
    return admission.admitted(vlm, Prepared(sample, pair, torch.tensor(answer), foil, widths))  # issue 20


def baseline_edits(
    vlm: VLM, prepared: Prepared, inputs: list[str], draws: list[int], *, padded: bool = True
) -> Edits:
    """Edits every chunk starts with: the Gaussian noise of the corrupted-input rows.

    `padded=False` for rows batched alone (the self-check): noised positions are then the
    row's own, not shifted by the left padding a chunk gives it.
    """
    edits = Edits()
    noise = prepared.pair.noise
    if noise is not None:
        rows = [r for r, side in enumerate(inputs) if side == "corrupt"]
        positions = None
        if noise.positions is not None:
            pad = prepared.pad("corrupt", "prompt") if padded else 0
            positions = tuple(p + pad for p in noise.positions)
        hook = vlm.adapter.embeddings[noise.embedding]
        edits.noise.append(
            NoisePlan(
                hook=hook,
                rows=tuple(rows),
                draws=tuple(draws[r] for r in rows),
                positions=positions,
                scale=noise.scale,
                seed=noise.seed,
                samples=prepared.pair.samples,
                units=image_units(vlm, prepared.rows(inputs)) if hook.layout.startswith("image_") else (),
            )
        )
    return edits


def image_units(vlm: VLM, rows: list[dict]) -> tuple[int, ...]:
    """Image tiles or tokens each batch row contributes to an `image_tiles` / `image_tokens` hook.

    From the adapter's `image_units`, or by default the row's count of image tokens, the
    placeholders the model fills with exactly one image feature each.
    """
    units = vlm.adapter.image_units
    if units is not None:
        return tuple(units(row) for row in rows)
    image_token = vlm.shape.image_token_id
    if image_token is None:
        raise ValueError(
            f"{vlm.adapter.family}: an image_tiles/image_tokens hook needs Adapter.image_units "
            "or an image token id (Adapter.image_token_config) to know which rows own which units."
        )
    return tuple(int((row["input_ids"] == image_token).sum()) for row in rows)


def plan(vlm: VLM, stack_name: str, prepared: Prepared, grid: Grid) -> Plan:
    """Cells of one sample and which of them have positions to patch."""
    stack = vlm.adapter.stacks[stack_name]
    clean = prepared.pair.clean.segments(stack.sequence)
    aligned = align(clean, prepared.pair.corrupt.segments(stack.sequence))
    cells = grid.cells(
        clean,
        n_layers=vlm.shape.layers[stack_name],
        n_heads=vlm.shape.heads[stack_name],
        site_layers={site: vlm.shape.layers_with(stack_name, site) for site in grid.sites},
    )
    work = [
        c
        for c, cell in enumerate(cells)
        if cell.layers  # a site that exists at none of the window's layers stays NaN
        and any(p in aligned.pairs for p in cell.positions)
        and (grid.positions != "tokens" or all(p in aligned.pairs for p in cell.positions))
    ]
    return Plan(prepared, cells, work, aligned.pairs, aligned.reasons)


def checked_stack(
    vlm: VLM, samples: Sequence[Sample], grid: Grid, direction: str, *, verb: str
) -> tuple[str, Stack]:
    """The grid's stack, after refusing inputs no sweep can run (before any forward)."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}.")
    admission.check_samples(vlm, samples)  # issue 20: types, texts, images (admission.py)
    if not samples:
        raise ValueError(f"no samples to {verb}: the data set is empty.")
    stack_name = grid.stack or vlm.adapter.default_stack
    if stack_name not in vlm.adapter.stacks:
        raise ValueError(f"{vlm.name} has no stack {stack_name!r}; it has {list(vlm.adapter.stacks)}.")
    stack = vlm.adapter.stacks[stack_name]
    grid.check(
        available_sites=list(stack.sites),
        n_layers=vlm.shape.layers[stack_name],
        n_heads=vlm.shape.heads[stack_name],
    )
    return stack_name, stack


def lay_out(
    vlm: VLM,
    samples: Sequence[Sample],
    stack_name: str,
    grid: Grid,
    corruption: Corruption,
    metric: Metric,
    direction: Direction,
    whole_answer: bool,
    recipe: str,
    extra_attrs: dict[str, Any],
) -> tuple[list[Plan], Layout, dict[str, Any]]:
    """Plans of every sample, where their cells go, and the result's attrs with its hash.

    Shared by exact patching and attribution patching, so both lay results out identically.
    """
    stack = vlm.adapter.stacks[stack_name]
    plans = [plan(vlm, stack_name, prepare(vlm, s, corruption, metric, whole_answer), grid) for s in samples]
    segments = [p.prepared.pair.clean.segments(stack.sequence) for p in plans]
    layout = Layout(
        list(samples),
        segments,
        [p.cells for p in plans],
        grid,
        [p.unpaired for p in plans],
        layer_kinds=vlm.shape.layer_kinds.get(stack_name, ()),
    )
    attrs = patching_attrs(
        vlm,
        grid=grid,
        stack=stack_name,
        corruption=corruption,
        metric=metric,
        direction=direction,
        whole_answer=whole_answer,
        recipe=recipe,
    )
    attrs.update(extra_attrs)
    attrs["config_hash"] = config_hash(
        {**attrs, "created": None, "samples": [fingerprint(s) for s in samples]}
    )
    return plans, layout, attrs


class NoEffectWarning(UserWarning):
    """The corruption left the metric unchanged for some samples."""


def warn_if_corruption_did_nothing(ds: xr.Dataset) -> None:
    """Say which samples have clean == corrupted: their normalised effects are undefined (NaN)."""
    variables = ds.variables
    same = (variables["clean"].values == variables["corrupt"].values) & variables["done"].values
    if same.any():
        ids = [str(i) for i in variables["sample"].values[same]]
        warnings.warn(
            f"{len(ids)} sample(s) score the same clean and corrupted ({', '.join(ids[:5])}"
            f"{', ...' if len(ids) > 5 else ''}): the corruption did not change the output, so "
            "normalised effects are NaN there. Use a stronger corruption or drop these samples.",
            NoEffectWarning,
            stacklevel=3,
        )


def fingerprint(sample: Sample) -> dict[str, Any]:
    """What of a sample determines its results (images by content hash)."""

    def image_hash(image) -> str | None:
        return None if image is None else hashlib.sha256(image.tobytes()).hexdigest()[:16]

    return {
        "id": sample.id,
        "prompt": sample.prompt,
        "answer": sample.answer,
        "foil": sample.foil,
        "spans": dict(sample.spans),
        "replacements": dict(sample.replacements),
        "image": image_hash(sample.image),
        "image_pair": image_hash(sample.image_pair),
    }
