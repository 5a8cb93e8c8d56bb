"""Activation patching over a grid: samples -> batched rows -> chunked traces -> a Dataset.

    ds = patch(vlm, samples, corruption=ReplaceSpan("visual"),
               grid=Grid(sites=("mlp", "attn"), windows=(1, 3, 6)), metric=Probability())
    ds["mlp"].sel(window=3).mean("sample")       # Basu et al.'s trace, averaged

Rows of one sample's forward, in order (the layout is the engine's business; results only
ever name clean and corrupted runs by variable, `clean` and `corrupt`):

    0                clean input
    1 .. k           corrupted input, noise draw 0 .. k-1 (k = 1 unless Gaussian noise)
    k+1 ..           one row per (cell, draw): the corrupted input with clean activations
                     copied in ("denoise", restoration) or the clean input with corrupted
                     activations copied in ("noise")

A sample's rows are cut into chunks of at most `max_batch` (or what `max_memory` allows);
every chunk repeats the k+1 baseline rows so its patches have their sources in the same
forward. A cell's value is the mean of its k rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr

from .corruptions import Corruption, Pair
from .data.sample import Sample
from .forward import SEQUENCE_FIELDS, Edits, NoisePlan, run, stack_rows
from .inputs import scored_answer_ids
from .metrics import Metric, Probability
from .models.adapter import Stack
from .models.load import VLM
from .positions import Segments
from .progress import progress_bar
from .results import patching_dataset
from .sites import HEAD_SITES, Cell, Grid

Direction = Literal["denoise", "noise"]


@dataclass
class SampleResult:
    """What one sample's sweep produced, before it becomes part of a Dataset."""

    sample: Sample
    segments: Segments
    cells: list[Cell]
    values: np.ndarray
    clean: float
    corrupt: float


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
    return Prepared(sample, pair, torch.tensor(answer), foil, widths)


def baseline_edits(vlm: VLM, prepared: Prepared, inputs: list[str], draws: list[int]) -> Edits:
    """Edits every chunk starts with: the Gaussian noise of the corrupted-input rows."""
    edits = Edits()
    noise = prepared.pair.noise
    if noise is not None:
        rows = [r for r, side in enumerate(inputs) if side == "corrupt"]
        positions = None
        if noise.positions is not None:
            pad = prepared.pad("corrupt", "prompt")
            positions = tuple(p + pad for p in noise.positions)
        edits.noise = NoisePlan(
            hook=vlm.adapter.embeddings[noise.embedding],
            rows=tuple(rows),
            draws=tuple(draws[r] for r in rows),
            positions=positions,
            scale=noise.scale,
            seed=noise.seed,
            samples=prepared.pair.samples,
        )
    return edits


def alignment(clean: Segments, corrupt: Segments) -> dict[int, int]:
    """Clean position -> corrupted position, matched segment by segment, index by index.

    Identical layouts map every position to itself; a replacement phrase of another length
    leaves the surplus span positions without a partner.
    """
    mapping: dict[int, int] = {}
    for name in clean.names:
        partners = [i for i, label in enumerate(corrupt.labels) if label == name]
        for a, b in zip(clean.positions(name), partners, strict=False):
            mapping[a] = b
    return mapping


def patch(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    corruption: Corruption,
    grid: Grid = Grid(),
    metric: Metric = Probability(),
    direction: Direction = "denoise",
    whole_answer: bool = False,
    max_batch: int = 64,
    max_memory: float | None = None,
    progress: bool = True,
    recipe: str = "",
    backend: Any = None,
) -> xr.Dataset:
    """Patch every cell of `grid` for every sample; return the metric of every patched run.

    `direction="denoise"` runs the corrupted input and restores clean activations (causal
    tracing); `"noise"` runs the clean input and patches in corrupted activations.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}.")
    if not samples:
        raise ValueError("no samples to patch: the data set is empty.")
    stack_name = grid.stack or vlm.adapter.default_stack
    if stack_name not in vlm.adapter.stacks:
        raise ValueError(f"{vlm.name} has no stack {stack_name!r}; it has {list(vlm.adapter.stacks)}.")
    stack = vlm.adapter.stacks[stack_name]
    n_layers, n_heads = vlm.shape.layers[stack_name], vlm.shape.heads[stack_name]
    grid.check(available_sites=list(stack.sites), n_layers=n_layers, n_heads=n_heads)
    results = []
    with progress_bar(progress, f"patching {vlm.name}") as bar:
        task = bar.add_task("samples", total=len(samples))
        for sample in samples:
            prepared = prepare(vlm, sample, corruption, metric, whole_answer)
            results.append(patch_sample(vlm, stack, prepared, grid, metric, direction, max_batch, max_memory))
            bar.advance(task)
    return patching_dataset(
        vlm,
        results,
        grid=grid,
        stack=stack_name,
        corruption=corruption,
        metric=metric,
        direction=direction,
        whole_answer=whole_answer,
        recipe=recipe,
    )


def patch_sample(
    vlm: VLM,
    stack: Stack,
    prepared: Prepared,
    grid: Grid,
    metric: Metric,
    direction: Direction,
    max_batch: int,
    max_memory: float | None,
    backend: Any = None,
) -> SampleResult:
    """All cells of one sample, in as few chunked forwards as the batch limits allow."""
    pair, k = prepared.pair, prepared.pair.samples
    clean_segments = pair.clean.segments(stack.sequence)
    aligned = alignment(clean_segments, pair.corrupt.segments(stack.sequence))
    stack_name = next(n for n, s in vlm.adapter.stacks.items() if s is stack)
    cells = grid.cells(
        clean_segments, n_layers=vlm.shape.layers[stack_name], n_heads=vlm.shape.heads[stack_name]
    )
    # Patched rows: (cell index, draw), only for cells whose positions have partners.
    patched = [
        (c, draw)
        for c, cell in enumerate(cells)
        if any(p in aligned for p in cell.positions)
        and (grid.positions != "tokens" or all(p in aligned for p in cell.positions))
        for draw in range(k)
    ]
    per_chunk = rows_per_chunk(vlm, prepared, max_batch, max_memory) - prepared.baseline_rows
    if per_chunk < 1:
        raise ValueError(
            f"max_batch={max_batch} leaves no room for patched rows next to the "
            f"{prepared.baseline_rows} baseline rows; use max_batch >= {prepared.baseline_rows + k}."
        )
    totals = np.zeros(len(cells))
    counts = np.zeros(len(cells))
    clean_value = corrupt_value = math.nan
    for start in range(0, max(len(patched), 1), per_chunk):
        chunk = patched[start : start + per_chunk]
        values = run_chunk(vlm, stack, prepared, cells, chunk, aligned, direction, metric, backend)
        clean_value = float(values[0])
        corrupt_value = float(values[1 : 1 + k].mean())
        for (c, _), value in zip(chunk, values[1 + k :].tolist(), strict=True):
            totals[c] += value
            counts[c] += 1
    with np.errstate(invalid="ignore"):
        cell_values = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
    return SampleResult(prepared.sample, clean_segments, cells, cell_values, clean_value, corrupt_value)


def run_chunk(
    vlm: VLM,
    stack: Stack,
    prepared: Prepared,
    cells: list[Cell],
    chunk: list[tuple[int, int]],
    aligned: dict[int, int],
    direction: Direction,
    metric: Metric,
    backend: Any = None,
) -> torch.Tensor:
    """Baseline rows + the chunk's patched rows, in one forward."""
    k = prepared.pair.samples
    patched_input = "corrupt" if direction == "denoise" else "clean"
    inputs = ["clean"] + ["corrupt"] * k + [patched_input] * len(chunk)
    draws = [0] + list(range(k)) + [draw for _, draw in chunk]
    edits = baseline_edits(vlm, prepared, inputs, draws)
    sequence = stack.sequence
    pad_clean, pad_corrupt = prepared.pad("clean", sequence), prepared.pad("corrupt", sequence)
    for offset, (c, draw) in enumerate(chunk):
        row = 1 + k + offset
        cell = cells[c]
        for clean_pos in cell.positions:
            if clean_pos not in aligned:
                continue
            corrupt_pos = aligned[clean_pos] + pad_corrupt
            clean_pos = clean_pos + pad_clean
            if direction == "denoise":
                dst_pos, src_row, src_pos = corrupt_pos, 0, clean_pos
            else:
                dst_pos, src_row, src_pos = clean_pos, 1 + draw, corrupt_pos
            for layer in cell.layers:
                edits.patch(layer, cell.site).add(row, dst_pos, src_row, src_pos, cell.head)
    batch = stack_rows(vlm, prepared.rows(inputs), prepared.widths)
    return run(
        vlm,
        stack,
        batch,
        edits,
        metric=metric,
        answer=prepared.answer,
        foil=prepared.foil,
        answer_slice=prepared.answer_slice(vlm),
        backend=backend,
    )


def rows_per_chunk(vlm: VLM, prepared: Prepared, max_batch: int, max_memory: float | None) -> int:
    """Rows per forward: `max_batch`, lowered to fit `max_memory` bytes when given.

    The estimate is the activations one row keeps alive during a forward (hidden states of
    a layer and its MLP, x4 for attention scores and temporaries) plus its answer logits.
    """
    if max_memory is None:
        return max_batch
    config = getattr(vlm.model.config, "text_config", vlm.model.config)
    hidden = config.hidden_size
    vocab = config.vocab_size
    width = max(prepared.widths.values())
    element = torch.finfo(vlm.model.dtype).bits // 8
    per_row = element * width * hidden * 4 * 4 + 4 * vocab * width
    return max(prepared.baseline_rows + prepared.pair.samples, min(max_batch, int(max_memory // per_row)))


__all__ = ["patch", "Direction", "HEAD_SITES"]
