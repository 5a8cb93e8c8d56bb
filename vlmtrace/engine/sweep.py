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
forward, and holds whole cells (all k draws), so a cell's value (the mean of its k rows) is
final when its chunk ends. With `store=`, each finished chunk is written to zarr at once
and a rerun of the same command resumes after the last written chunk (`vlmtrace.results.store`);
`shard=(i, n)` runs the i-th of n disjoint parts of the samples into the same store. On an
out-of-memory error a chunk is halved and retried.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..models.adapter import Stack
from ..models.load import VLM
from ..presentation.progress import progress_bar
from ..results.dataset import Layout, describe
from ..results.store import SweepStore
from . import attribution
from .corruptions import Corruption
from .forward import Prefix, resume_cache, run, stack_rows
from .invariants import verify_baselines
from .metrics import Metric, Probability
from .planning import (
    Direction,
    Plan,
    Prepared,
    baseline_edits,
    checked_stack,
    lay_out,
    warn_if_corruption_did_nothing,
    with_layer_kinds,
)
from .prefix_reuse import (
    check_prefix_reuse,
    prefix_of,
    resumable_start,
    shifted,
    suffix_batch,
)
from .sites import Cell, Grid


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
    store: str | Path | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    recipe: str = "",
    backend: Any = None,
    screen: int | None = None,
    reuse_prefix: bool = False,
    verify: bool = True,
) -> xr.Dataset:
    """Patch every cell of `grid` for every sample; return the metric of every patched run.

    `direction="denoise"` runs the corrupted input and restores clean activations (causal
    tracing); `"noise"` runs the clean input and patches in corrupted activations. With
    `store`, results are written to zarr as chunks finish and a rerun resumes. With
    `screen=k`, attribution patching (`vlmtrace.engine.attribution`) estimates every cell first and
    only the k cells of largest estimated |effect| per sample, window and site are patched;
    the others stay NaN. With `reuse_prefix=True`, the clean and corrupted runs are computed
    once per sample and every chunk starts from them: the layers below its first patched layer
    are skipped, in a causal decoder only the positions from its first patched one are
    computed (on cached keys/values), and the image encoder runs once per distinct image.
    Same results; local runs only (`tests/test_prefix_reuse.py`). With `verify` (the default),
    the first chunk's batched clean and corrupted rows are checked against unbatched forwards
    of the same inputs (`vlmtrace.engine.invariants.verify_baselines`, two forwards) and the sweep
    stops with `SelfCheckError` if they differ.
    """
    stack_name, stack = checked_stack(vlm, samples, grid, direction, verb="patch")
    if getattr(backend, "mode", None) == "submit":
        raise ValueError(
            "a sweep needs each chunk's values before it writes them, so it cannot use a "
            "non-blocking 'submit' backend; use mode='poll' (no connection held while a chunk "
            "runs) or 'stream', or submit single traces of your own with mode='submit'."
        )
    if reuse_prefix:
        check_prefix_reuse(vlm, stack, backend)
    mine = shard_indices(len(samples), shard)
    # `screen` is part of the hash: a screened store never resumes an unscreened one; so is
    # `reuse_prefix`, which runs cells in another order
    extra = {} if screen is None else {"screen": screen}
    if reuse_prefix:
        extra["reuse_prefix"] = True
    plans, layout, attrs = lay_out(
        vlm, samples, stack_name, grid, corruption, metric, direction, whole_answer, recipe, extra
    )
    ds = with_layer_kinds(layout.empty(attrs), vlm, stack_name)
    sweep_store = SweepStore.open_or_create(store, ds, overwrite=overwrite) if store is not None else None
    if sweep_store is not None:
        ds = sweep_store.read()  # resume from what is on disk: chunks write whole samples back
        done_cells, done = ds["progress"].values.copy(), ds["done"].values.copy()
    else:
        done_cells, done = np.zeros(len(samples), dtype=np.int64), np.zeros(len(samples), dtype=bool)
    if screen is not None:
        todo = [i for i in mine if not done[i]]
        estimates = with_layer_kinds(layout.empty(attrs), vlm, stack_name)
        attribution.estimate(
            estimates, layout, plans, vlm, stack, direction=direction, metric=metric, indices=todo
        )
        masks = attribution.screen(estimates, screen)
        for i in todo:  # deterministic, so a resumed run screens the same cells
            plans[i].work = attribution.keep_screened(plans[i], layout, i, masks)
    if reuse_prefix:
        for p in plans:  # deterministic, so a resumed run continues the same order
            p.work = sorted(p.work, key=lambda c, p=p: min(p.cells[c].layers))
    total = sum(len(plans[i].work) - int(done_cells[i]) for i in mine if not done[i])
    with progress_bar(progress, f"patching {vlm.name}") as bar:
        task = bar.add_task("cells", total=total)
        for i in mine:
            if done[i]:
                continue
            for finished in patch_sample(
                vlm,
                stack,
                plans[i],
                direction,
                metric,
                max_batch,
                max_memory,
                backend,
                start=int(done_cells[i]),
                reuse_prefix=reuse_prefix,
            ):
                if verify:
                    verify_baselines(vlm, stack, plans[i].prepared, finished.baselines, metric, backend)
                    verify = False
                record(ds, layout, i, plans[i], finished)
                if sweep_store is not None:
                    sweep_store.write(ds, i)
                bar.advance(task, finished.cells)
    result = sweep_store.read() if sweep_store is not None else ds
    warn_if_corruption_did_nothing(result)
    # `progress` is the store's bookkeeping (`done` says what is finished); variables carry
    # their description and units in memory as on disk, so a saved result is identical
    return describe(result.drop_vars("progress"))


def shard_indices(n: int, shard: tuple[int, int] | None) -> list[int]:
    """Sample indices of shard i of n (i = 0..n-1): every n-th sample, starting at i."""
    if shard is None:
        return list(range(n))
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"shard must be (i, n) with 0 <= i < n, got {shard}; e.g. --shard 0/2 and --shard 1/2."
        )
    return list(range(index, n, count))


@dataclass
class Finished:
    """What one chunk established: values of some cells, baselines, progress."""

    values: dict[int, float]
    clean: float
    corrupt: float
    progress: int
    """Cells of the sample's work list now complete."""
    complete: bool
    cells: int
    """Cells this chunk completed (for the progress bar)."""
    baselines: list[float] = field(default_factory=list)
    """The chunk's baseline rows: clean, then one per noise draw (the self-check reads them)."""


def record(ds: xr.Dataset, layout: Layout, sample: int, plan: Plan, finished: Finished) -> None:
    """Put a chunk's results into the in-memory result."""
    arrays = {site: ds[site].values for site in layout.grid.sites}  # one lookup per site, not per cell
    for c, value in finished.values.items():
        cell = plan.cells[c]
        arrays[cell.site][layout.index(sample, cell)] = value
    ds["clean"].values[sample] = finished.clean
    ds["corrupt"].values[sample] = finished.corrupt
    ds["progress"].values[sample] = finished.progress
    ds["done"].values[sample] = finished.complete


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or an allocator failure reported as a RuntimeError."""
    message = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def patch_sample(
    vlm: VLM,
    stack: Stack,
    plan: Plan,
    direction: Direction,
    metric: Metric,
    max_batch: int,
    max_memory: float | None,
    backend: Any = None,
    *,
    start: int = 0,
    reuse_prefix: bool = False,
) -> Iterator[Finished]:
    """Run a sample's cells from `start`, yielding after every chunk (whole cells per chunk).

    With `reuse_prefix`, a chunk holds cells of one first patched layer only, and runs from
    that layer on (`prefix_of`, `run_chunk`).
    """
    prepared, k = plan.prepared, plan.prepared.pair.samples
    rows = rows_per_chunk(vlm, prepared, max_batch, max_memory) - prepared.baseline_rows
    per_chunk = rows // k
    if per_chunk < 1:
        raise ValueError(
            f"max_batch={max_batch} leaves no room for one cell ({k} rows) next to the "
            f"{prepared.baseline_rows} baseline rows; use max_batch >= {prepared.baseline_rows + k}."
        )
    position = start
    computed: Prefix | None = None
    while True:
        chunk_cells = plan.work[position : position + per_chunk]
        if reuse_prefix and chunk_cells:
            first = min(plan.cells[chunk_cells[0]].layers)
            chunk_cells = [c for c in chunk_cells if min(plan.cells[c].layers) == first]
            if computed is None:
                computed = prefix_of(vlm, stack, prepared)
        chunk = [(c, draw) for c in chunk_cells for draw in range(k)]
        try:
            values = run_chunk(
                vlm, stack, prepared, plan.cells, chunk, plan.aligned, direction, metric, backend, computed
            )
        except Exception as error:
            if not is_out_of_memory(error) or per_chunk == 1:
                raise
            per_chunk //= 2  # halve and retry the same cells
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        cell_values = values[1 + k :].view(len(chunk_cells), k).mean(1) if chunk else values[:0]
        position += len(chunk_cells)
        yield Finished(
            values=dict(zip(chunk_cells, cell_values.tolist(), strict=True)),
            clean=float(values[0]),
            corrupt=float(values[1 : 1 + k].mean()),
            progress=position,
            complete=position >= len(plan.work),
            cells=len(chunk_cells),
            baselines=values[: 1 + k].tolist(),
        )
        if position >= len(plan.work):
            return


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
    prefix: Prefix | None = None,
) -> torch.Tensor:
    """Baseline rows + the chunk's patched rows, in one forward.

    With the baseline rows' `prefix` (`prefix_of`), the layers below the chunk's first patched
    layer are skipped, and in a causal decoder only the positions from the first patched one
    on are computed, on top of the baseline rows' keys and values: each row starts from its
    own baseline row's states, which it equals up to there.
    """
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
    skip = image = None
    if prefix is not None and edits.patches:
        # each row's baseline row: clean is row 0, corrupted draw d is row 1 + d
        patched_sources = [1 + d if patched_input == "corrupt" else 0 for _, d in chunk]
        sources = [0] + [1 + d for d in range(k)] + patched_sources
        start = resumable_start(prepared, edits, prefix)
        if start > 0:
            cache = resume_cache(prefix, sources, start)
            embeddings = None if prefix.embeddings is None else prefix.embeddings[sources]
            batch = suffix_batch(vlm, batch, stack, cache, start, embeddings)
            edits = shifted(edits, start)
        first = min(layer for layer, _ in edits.patches)
        if first > 0:
            skip = (first, prefix.states[first - 1][sources][:, start:])
        if start == 0 and prefix.image is not None:  # the suffix of a resumed run has no image
            image = prefix.image_rows(sources)
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
        prefix=skip,
        image=image,
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
    logits = len(prepared.answer) if vlm.adapter.keeps_last_logits else width
    per_row = element * width * hidden * 4 * 4 + 4 * vocab * logits
    return max(prepared.baseline_rows + prepared.pair.samples, min(max_batch, int(max_memory // per_row)))
