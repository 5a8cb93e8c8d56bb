"""Activation patching over a grid: samples -> batched rows -> chunked traces -> a Dataset.

    ds = patch(vlm, samples, corruption=ReplaceSpan("visual"),
               grid=Grid(sites=("mlp", "attn"), windows=(1, 3, 6)), metric=Probability())
    ds["mlp"].sel(window=3).mean("sample")       # Basu et al.'s trace, averaged

Rows of one sample in a forward, in order (the layout is the engine's business; results only
ever name clean and corrupted runs by variable, `clean` and `corrupt`):

    0                clean input
    1 .. k           corrupted input, noise draw 0 .. k-1 (k = 1 unless Gaussian noise)
    k+1 ..           one row per (cell, draw): the corrupted input with clean activations
                     copied in ("denoise", restoration) or the clean input with corrupted
                     activations copied in ("noise")

A sample's cells are cut into chunks of at most `max_batch` rows (or what `max_memory`
allows); every chunk repeats the k+1 baseline rows so its patches have their sources in the
same forward, and holds whole cells (all k draws), so a cell's value (the mean of its k rows)
is final when its chunk ends. Where a sample's last chunk leaves room, the next samples' rows
fill the same forward, each sample with its own baseline rows (`vlmtrace.engine.packing`).
With `store=`, each finished chunk is written to zarr at once and a rerun of the same command
resumes after the last written chunk (`vlmtrace.results.store`); the sweep holds the store's
lock until its last chunk, so no other run replaces the store under it. `shard=(i, n)` runs
the i-th of n disjoint parts of the samples into the same store. On an out-of-memory error a
forward is halved and retried.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import takewhile
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
from . import attribution, screening
from .admission import check_arguments
from .corruptions import Corruption
from .forward import ForwardPlan, Prefix, forward_plan, resume_cache, run_plans, shared_images, stack_rows
from .grouping import RequestPacer
from .metrics import Metric, Probability
from .packing import Share, common_widths, next_forward, offsets, packed_edits, pad, scoring, signature
from .planning import (
    Direction,
    Plan,
    Prepared,
    checked_stack,
    lay_out,
    warn_if_corruption_did_nothing,
)
from .prefix_reuse import (
    check_prefix_reuse,
    prefix_of,
    resumable_start,
    shifted,
    suffix_batch,
)
from .self_check import SweepCheck
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
    screen_method: attribution.Method = "atp",
    reuse_prefix: bool = False,
    verify: bool | float = True,
    pack_samples: bool = True,
) -> xr.Dataset:
    """Patch every cell of `grid` for every sample; return the metric of every patched run.

    `direction="denoise"` runs the corrupted input and restores clean activations (causal tracing);
    `"noise"` runs the clean input and patches in corrupted activations. With `store`, results are
    written to zarr as chunks finish and a rerun resumes. With `screen=k`, attribution patching
    (`vlmtrace.engine.attribution`) estimates every cell first and only the k cells of largest
    estimated |effect| per sample, window and site are patched; the others stay NaN. Estimates rank
    cells imperfectly, so ask for 3x the cells you will read: to read the top 5, `screen=15`. On the
    three shipped trained organisms (`benchmarks/screened_sweep.py`, RESULTS.md), `screen=15,
    screen_method="atp*"` held every cell of the full sweep's material top 5 in its own top 5 (atp,
    the default: at least 0.94; `screen=5`: 0.62-0.70). "atp*" needs the adapter to declare its
    attention scores (`Stack.scores`; else `QKFixError`: use "atp+graddrop", 0.97).
    `screen_method="ig"` estimates with integrated gradients. With `reuse_prefix=True`, the clean
    and corrupted runs are computed once per sample and every chunk starts from them: the layers
    below its first patched layer are skipped, in a causal decoder only the positions from its first
    patched one are computed (on cached keys/values), and the image encoder runs once per distinct
    image. Same results; local runs only (`tests/test_prefix_reuse.py`); a forward then holds one
    sample's rows. With `verify` (the default), the batched clean and corrupted rows of the first
    forward's most padded sample are checked against the model's own forward of the same prompt and
    image, and every later forward's baseline rows against the sample's first
    (`vlmtrace.engine.self_check`; a float sets the tolerance in nats); the sweep stops with
    `SelfCheckError` if they differ. A forward holds the rows of several samples where one sample's
    leave room (`vlmtrace.engine.packing`); `pack_samples=False` runs one sample per forward, for
    benchmarks and tests: the results are the same, up to float rounding.
    """
    check_arguments(metric=metric, max_batch=max_batch, max_memory=max_memory, shard=shard, store=store)
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
    if screen is not None and screen_method != "atp":
        extra["screen_method"] = screen_method
    if reuse_prefix:
        extra["reuse_prefix"] = True
    plans, layout, attrs = lay_out(
        vlm, samples, stack_name, grid, corruption, metric, direction, whole_answer, recipe, extra
    )
    ds = layout.empty(attrs)
    with SweepStore.opened(store, ds, overwrite=overwrite) as sweep_store:  # its lock held to the end
        if sweep_store is not None:
            ds = sweep_store.read()  # resume from what is on disk: chunks write whole samples back
            done_cells, done = ds["progress"].values.copy(), ds["done"].values.copy()
        else:
            done_cells, done = np.zeros(len(samples), dtype=np.int64), np.zeros(len(samples), dtype=bool)
        if screen is not None:
            todo = [i for i in mine if not done[i]]
            estimates = layout.empty(attrs)
            attribution.estimate(
                estimates,
                layout,
                plans,
                vlm,
                stack,
                direction=direction,
                metric=metric,
                method=screen_method,
                indices=todo,
            )
            masks = screening.screen(estimates, screen)
            for i in todo:  # deterministic, so a resumed run screens the same cells
                plans[i].work = screening.keep_screened(plans[i], layout, i, masks)
        if reuse_prefix:
            for p in plans:  # deterministic, so a resumed run continues the same order
                p.work = sorted(p.work, key=lambda c, p=p: min(p.cells[c].layers))
        pending = [(i, int(done_cells[i])) for i in mine if not done[i]]
        total = sum(len(plans[i].work) - start for i, start in pending)
        check = None
        if verify is not False:
            check = SweepCheck(vlm, backend=backend, tolerance=None if verify is True else float(verify))
        with progress_bar(progress, f"patching {vlm.name}") as bar:
            task = bar.add_task("cells", total=total)
            for forward in run_forwards(
                vlm,
                stack,
                plans,
                pending,
                direction,
                metric,
                max_batch,
                max_memory,
                backend,
                reuse_prefix=reuse_prefix,
                pack=pack_samples,
                check=check,
            ):
                for share, finished in forward:  # a forward may finish one sample and start the next
                    record(ds, layout, share.sample, share.plan, finished)
                    if sweep_store is not None:
                        sweep_store.write(ds, share.sample)
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
    """What one chunk of a sample established (its share of a forward): values of some
    cells, baselines, progress."""

    values: dict[int, float]
    clean: float
    corrupt: float
    progress: int
    """Cells of the sample's work list now complete."""
    complete: bool
    cells: int
    """Cells this chunk completed (for the progress bar)."""


def record(ds: xr.Dataset, layout: Layout, sample: int, plan: Plan, finished: Finished) -> None:
    """Put a chunk's results into the in-memory result.

    A sample's clean and corrupted values are its first chunk's (checked against the model's
    own forward when the self-check picked it); every later chunk recomputes them, and the
    self-check holds those to the first, so they never replace it. Each is filled where it is
    still missing, on its own: a sweep killed between the store's `clean` and `corrupt` writes
    resumes with `clean` on disk and `corrupt` not.
    """
    # the variables' own arrays, written in place (`ds[name]` would build a DataArray per lookup)
    variables = ds.variables
    names = (*layout.grid.sites, "clean", "corrupt", "progress", "done")
    arrays = {name: variables[name].values for name in names}
    lazy = [name for name in names if variables[name].values is not arrays[name]]
    if lazy:  # each read makes a new array: values written into one would be lost without a word
        raise RuntimeError(
            f"the result's variables {lazy} are not held in memory (a lazily opened store?), so the "
            "chunk's values would be lost; load the Dataset (ds.load()) before recording into it."
        )
    for c, value in finished.values.items():
        cell = plan.cells[c]
        arrays[cell.site][layout.index(sample, cell)] = value
    for name, value in (("clean", finished.clean), ("corrupt", finished.corrupt)):
        if np.isnan(arrays[name][sample]):
            arrays[name][sample] = value
    arrays["progress"][sample] = finished.progress
    arrays["done"][sample] = finished.complete


class OutOfMemoryWarning(UserWarning):
    """A forward ran out of memory and is retried at fewer rows: the values are unchanged (each
    row's are computed alone), but every forward of the sweep after it is smaller, and slower."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OOM error, or an allocator failure reported as a RuntimeError."""
    message = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)
    )


def run_forwards(
    vlm: VLM,
    stack: Stack,
    plans: Sequence[Plan],
    pending: Sequence[tuple[int, int]],
    direction: Direction,
    metric: Metric,
    max_batch: int,
    max_memory: float | None,
    backend: Any = None,
    *,
    reuse_prefix: bool = False,
    pack: bool = True,
    check: SweepCheck | None = None,
) -> Iterator[list[tuple[Share, Finished]]]:
    """Run the cells of every pending (sample, first unfinished cell), forward by forward.

    Yields each forward's shares (`vlmtrace.engine.packing.Share`: one sample's whole cells)
    with what each finished. With `pack`, a forward that one sample's cells leave room in
    takes the next samples' too. With `reuse_prefix`, a forward holds one sample's cells of
    one first patched layer only, and runs from that layer on (`prefix_of`, `plan_chunk`).
    After an out-of-memory error the forward is retried at half the rows, and no later forward
    of the sweep is larger. With `check`, every forward's baseline rows are probed and checked
    (`vlmtrace.engine.self_check`): the first forward's most padded sample against the model's
    own forward, every sample's later forwards against its first.

    With a remote `backend`, forwards travel in groups, one request each, sized by
    `grouping.RequestPacer`. Each forward still holds only its own rows, and each is yielded
    (and written to the store) as its request returns.
    """
    pending = list(pending)
    pack = pack and not reuse_prefix
    signatures = {i: signature(vlm, plans[i].prepared) for i, _ in pending} if pack else {}
    cap: int | None = None  # rows per forward, once one ran out of memory
    computed: tuple[int, Prefix] | None = None  # the prefix of the sample prefix reuse is on
    pacer = RequestPacer(backend)

    def rows(prepared: list[Prepared]) -> int:
        budget = rows_per_chunk(vlm, prepared, max_batch, max_memory)
        return budget if cap is None else min(budget, cap)

    while pending:
        group: list[tuple[list[Share], list[torch.Tensor] | None, ForwardPlan]] = []
        ahead = pending
        while ahead and len(group) < pacer.size:
            shares = next_forward(plans, ahead, rows=rows, pack=pack, signatures=signatures)
            prefix = None
            if reuse_prefix and shares[0].cells:
                share = shares[0]
                first = min(share.plan.cells[share.cells[0]].layers)
                same_first = takewhile(
                    lambda c, s=share, f=first: min(s.plan.cells[c].layers) == f, share.cells
                )
                shares = [replace(share, cells=tuple(same_first))]
                if computed is None or computed[0] != share.sample:
                    computed = (share.sample, prefix_of(vlm, stack, share.prepared))
                prefix = computed[1]
            chunk = [
                (j, c, draw)
                for j, s in enumerate(shares)
                for c in s.cells
                for draw in range(s.prepared.pair.samples)
            ]
            probes = None
            if check is not None:
                native = most_padded(shares)
                probes = [check.probes_for(s.sample, s.prepared, native=s is native) for s in shares]
            forward = plan_chunk(
                vlm,
                stack,
                [s.prepared for s in shares],
                [s.plan.cells for s in shares],
                chunk,
                [s.plan.aligned for s in shares],
                direction,
                metric,
                prefix,
                probes,
            )
            group.append((shares, probes, forward))
            ahead = after(ahead, shares)
        started = time.monotonic()
        try:
            results = run_plans(vlm, [forward for _, _, forward in group], backend)
        except Exception as error:
            cap = halved(group[0][0]) if is_out_of_memory(error) else None
            if cap is None:
                raise
            warnings.warn(
                f"out of memory in a forward of {sum(s.rows for s in group[0][0])} rows; retrying at "
                f"{cap} rows per forward for the rest of the sweep (a lower max_batch, or "
                "max_memory, avoids the retry).",
                OutOfMemoryWarning,
                stacklevel=2,
            )
            pacer.restart()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        pacer.ran(len(group), time.monotonic() - started)
        for (shares, probes, _), (values, probed) in zip(group, results, strict=True):
            if check is not None:
                for share, baseline in zip(shares, probed_rows(shares, probed, probes), strict=True):
                    check.verify(share.sample, share.prepared, baseline)
            yield list(zip(shares, finished_by(shares, values), strict=True))
        pending = ahead


def after(pending: list[tuple[int, int]], shares: list[Share]) -> list[tuple[int, int]]:
    """What is pending once a forward of `shares` has run: its samples leave, and the last one
    comes back at its first cell not run when the forward held only part of it."""
    last = shares[-1]
    rest = pending[len(shares) :]
    return rest if last.completes else [(last.sample, last.end), *rest]


def halved(shares: list[Share]) -> int | None:
    """Rows per forward after `shares` ran out of memory: half its rows, or room for half its
    cells next to one sample's baseline rows; None when one cell of one sample is all it held."""
    cells = sum(len(s.cells) for s in shares)
    if len(shares) == 1 and cells <= 1:
        return None
    prepared = shares[0].prepared
    rows = sum(s.rows for s in shares)
    return max(rows // 2, prepared.baseline_rows + prepared.pair.samples * max(1, cells // 2))


def finished_by(shares: list[Share], values: torch.Tensor) -> list[Finished]:
    """What each share of a forward established, from the forward's row values."""
    results, first = [], 0
    for share in shares:  # a share's rows are consecutive, in the forward's order
        k = share.prepared.pair.samples
        own, first = values[first : first + share.rows], first + share.rows
        cell_values = own[1 + k :].view(len(share.cells), k).mean(1)
        results.append(
            Finished(
                values=dict(zip(share.cells, cell_values.tolist(), strict=True)),
                clean=float(own[0]),
                corrupt=float(own[1 : 1 + k].mean()),
                progress=share.end,
                complete=share.completes,
                cells=len(share.cells),
            )
        )
    return results


def most_padded(shares: list[Share]) -> Share:
    """The share whose rows a forward pads most (the first on a tie): the self-check's pick,
    since padding to another sample's width is what batching adds to a row."""
    widths = common_widths([share.prepared for share in shares])
    return max(shares, key=lambda share: sum(widths[q] - w for q, w in share.prepared.widths.items()))


def probed_rows(shares: list[Share], probed: torch.Tensor, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each share's probes, [baseline row, token], from a forward's flat probe values."""
    rows, first = [], 0
    for share, ids in zip(shares, probes, strict=True):
        n = share.prepared.baseline_rows * len(ids)
        rows.append(probed[first : first + n].view(share.prepared.baseline_rows, len(ids)))
        first += n
    return rows


def plan_chunk(
    vlm: VLM,
    stack: Stack,
    prepared: Sequence[Prepared],
    cells: Sequence[list[Cell]],
    chunk: list[tuple[int, int, int]],
    aligned: Sequence[Mapping[int, int]],
    direction: Direction,
    metric: Metric,
    prefix: Prefix | None = None,
    probes: Sequence[torch.Tensor] | None = None,
) -> ForwardPlan:
    """Each sample's baseline rows, then its patched rows, for every sample of one forward.

    `prepared`, `cells` and `aligned` hold one entry per sample of the forward; `chunk` one
    (sample of the forward, cell, draw) per patched row, grouped by sample. Every row is
    padded to the forward's widths (`packing.common_widths`) and patched from its own
    sample's baseline rows; the values come back in row order.

    With the baseline rows' `prefix` (`prefix_of`, one sample only), the layers below the
    chunk's first patched layer are skipped, and in a causal decoder only the positions from
    the first patched one on are computed, on top of the baseline rows' keys and values: each
    row starts from its own baseline row's states, which it equals up to there.

    Returns the forward, planned: run, it gives the values in row order and the probes of
    each sample's baseline rows at its `probes` tokens (`forward.run_plans`; empty without
    `probes`).
    """
    patched_input = "corrupt" if direction == "denoise" else "clean"
    counts = [sum(1 for j, _, _ in chunk if j == sample) for sample in range(len(prepared))]
    firsts = offsets(prepared, counts)
    widths = common_widths(prepared)
    inputs = [
        ["clean"] + ["corrupt"] * p.pair.samples + [patched_input] * n
        for p, n in zip(prepared, counts, strict=True)
    ]
    draws = [
        [0, *range(p.pair.samples), *(draw for j, _, draw in chunk if j == sample)]
        for sample, p in enumerate(prepared)
    ]
    edits = packed_edits(vlm, prepared, inputs, draws, widths)
    sequence = stack.sequence
    next_row = [first + p.baseline_rows for first, p in zip(firsts, prepared, strict=True)]
    pads = [(pad(p, "clean", sequence, widths), pad(p, "corrupt", sequence, widths)) for p in prepared]
    for j, c, draw in chunk:
        row, first, cell = next_row[j], firsts[j], cells[j][c]
        next_row[j] += 1
        pad_clean, pad_corrupt = pads[j]
        for clean_pos in cell.positions:
            if clean_pos not in aligned[j]:
                continue
            corrupt_pos = aligned[j][clean_pos] + pad_corrupt
            clean_pos = clean_pos + pad_clean
            if direction == "denoise":
                dst_pos, src_row, src_pos = corrupt_pos, first, clean_pos
            else:
                dst_pos, src_row, src_pos = clean_pos, first + 1 + draw, corrupt_pos
            for layer in cell.layers:
                edits.patch(layer, cell.site).add(row, dst_pos, src_row, src_pos, cell.head)
    rows = [row for p, sides in zip(prepared, inputs, strict=True) for row in p.rows(sides)]
    # each image encoded once, unless prefix reuse supplies the encoder's output (`image` below)
    images = (
        None if prefix is not None and prefix.image is not None else shared_images(vlm, rows, stack, edits)
    )
    batch = stack_rows(vlm, rows, widths, images)
    skip = image = None
    if prefix is not None and edits.patches:
        if len(prepared) != 1:
            raise ValueError("prefix reuse runs one sample per forward")
        k = prepared[0].pair.samples
        # each row's baseline row: clean is row 0, corrupted draw d is row 1 + d
        patched_sources = [1 + d if patched_input == "corrupt" else 0 for _, _, d in chunk]
        sources = [0] + [1 + d for d in range(k)] + patched_sources
        start = resumable_start(prepared[0], edits, prefix)
        if start > 0:
            cache = resume_cache(prefix, sources, start)
            embeddings = None if prefix.embeddings is None else prefix.embeddings[sources]
            batch = suffix_batch(vlm, batch, stack, cache, start, embeddings)
            edits = shifted(edits, start)
            images = None  # the suffix holds no image: the encoder does not run
        first_layer = min(layer for layer, _ in edits.patches)
        if first_layer > 0:
            skip = (first_layer, prefix.states[first_layer - 1][sources][:, start:])
        if start == 0 and prefix.image is not None:  # the suffix of a resumed run has no image
            image = prefix.image_rows(sources)
    return forward_plan(
        vlm,
        stack,
        batch,
        edits,
        metric=metric,
        scoring=scoring(vlm, prepared, counts, probes),
        prefix=skip,
        image=image,
        images=images,
    )


def rows_per_chunk(vlm: VLM, prepared: Sequence[Prepared], max_batch: int, max_memory: float | None) -> int:
    """Rows per forward of these samples: `max_batch`, lowered to fit `max_memory` bytes when given
    (`row_bytes` at the widest sample's width), never below one sample's baseline rows and a cell."""
    if max_memory is None:
        return max_batch
    config = getattr(vlm.model.config, "text_config", vlm.model.config)
    width = max(max(p.widths.values()) for p in prepared)
    logits = max(len(p.answer) for p in prepared) if vlm.adapter.keeps_last_logits else width
    per_row = row_bytes(config, width, element=torch.finfo(vlm.model.dtype).bits // 8, logits=logits)
    smallest = max(p.baseline_rows + p.pair.samples for p in prepared)
    return max(smallest, min(max_batch, int(max_memory // per_row)))


def row_bytes(config: Any, width: int, *, element: int, logits: int) -> int:
    """The activations one row of a forward holds at its peak, from the language model's config.

    A forward without a KV cache holds one layer's activations at a time, so a row's peak is
    its layer's largest phase plus the residual stream (input, normed input, output: 4 x
    width x hidden): attention (queries, keys, values and their rotated copies, 6 x width x
    hidden, and the scores, heads x width^2: where attention is eager, in the dtype, then a
    float32 copy and the float32 softmax of it; otherwise one copy in the dtype) or the MLP
    (gate, up and their product, 3 x width x intermediate); then the float32 logits kept.
    On LLaVA-1.5-7B's shapes in bfloat16 the CPU allocator's peak is 146 MiB a row with eager
    attention (this says 151) and 68 MiB with SDPA (this says 67), the same at 2 and 4 layers
    (`benchmarks/chunk_memory.py`). The vision tower is not counted: it runs before the decoder,
    and CLIP-L's eager attention needs ~51 MiB a row there; a tower wider than that would need it.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or 4 * hidden
    if getattr(config, "_attn_implementation", "eager") in (None, "eager"):
        per_score = element + (4 if element != 4 else 0) + 4  # scores, a float32 copy, the softmax
    else:
        per_score = element
    attention = 6 * width * hidden * element + heads * width**2 * per_score
    mlp = 3 * width * intermediate * element
    return 4 * width * hidden * element + max(attention, mlp) + 4 * config.vocab_size * logits
