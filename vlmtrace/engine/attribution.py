"""Attribution patching: estimate a whole patching grid from one forward and backward pass.

Exact patching runs one forward per cell; a (layer x position x head) grid of a 7B LLaVA
has ~10^5 cells. Attribution patching (Nanda 2023; Syed et al. 2023; Kramár et al. 2024,
"AtP*") replaces each patched run by its first-order Taylor expansion around the run that is
patched: restoring clean activations `a_clean` into the corrupted run changes the metric by
about `grad m(corrupted) . (a_clean - a_corrupt)`, summed over the activations the cell
restores. One backward pass gives the gradient at every site at once, so the whole grid
costs one forward and one backward per sample instead of one forward per cell:

    est = attribute(vlm, samples, corruption=ImagePair(), grid=Grid(sites=("mlp", "attn_head")))
    masks = screen(est, k=20)                     # top 20 cells per (sample, window) and site
    exact = patch(vlm, samples, ...)              # same layout: compare cell by cell
    agreement(est, exact, k=20)["mlp"]            # {"overlap": ..., "spearman": ...}

(`screen` and `agreement` are in `vlmtrace.engine.screening`.)

The result has exactly the layout of `vlmtrace.patch` for the same arguments (same
variables, dims, coordinates, NaN where a cell has nothing to patch), with the estimate of
the patched run's metric in each cell:

    denoise   m_corrupt + sum_cell grad m(corrupt) . (a_clean - a_corrupt)
    noise     m_clean   + sum_cell grad m(clean)   . (a_corrupt - a_clean)

A cell's sum runs over its positions (segments, "all") and over the layers of its window;
Gaussian noise with k draws averages the k estimates, as patching averages the k runs.

Five estimators, chosen by `method` (`METHODS`):

    atp   the gradient at the patched run (above): one row per run, exact for small changes.
    ig    integrated gradients (Sundararajan et al. 2017; EAP-IG, Hanna et al. 2024): the
          gradient averaged over `steps` points of a straight path between the two runs,
          `sum_cell mean_alpha grad m(x_alpha) . (a_clean - a_corrupt)`. The path runs through
          the embeddings, where corruptions act (`Adapter.embeddings`: token embeddings at
          aligned prompt positions, each image whole), so its points are real forwards of
          the same model and its end is the other run. Each point is one more row of the
          same forward and backward: 1 + k (steps + 2) rows instead of 1 + k.
    atp+qk        AtP*'s QK fix (Kramár et al. 2024): atp, with the attention softmax that the
          patch meets first (the next layer's self-attention; after a stack's last layer, the
          cross-attention of a stack reading it) recomputed exactly for the patched queries
          and keys instead of linearised (`vlmtrace.engine.qk_fix`). One more forward, of a row
          per (site, layer, head) patched at every position at once.
    atp+graddrop  AtP*'s GradDrop: one more copy of the gradient rows per layer of every stack,
          that layer passing its gradient straight from output to input (its own computation
          cut out of the backward pass); a cell's score is the sum of |estimate| over the
          copies / (L - 1), signed as the atp estimate. A path that cancels another through
          some layer then shows in the copy that skips it. A screening score, not an estimate
          of the patched metric: rank with it, do not read its values.
    atp*          both: GradDrop over QK-fixed estimates (each copy's fix weighed by that copy's
          gradient of the pattern), as AtP* combines them.

What the first order misses, so read the estimates as a *screen*, not a measurement:
- Saturation: where P(answer) is near 0 or 1 the gradient at the run is small and says
  little about a large change (AtP*'s first failure mode, Kramár et al. 2024). `ig` samples
  the path where the metric moves; `atp+qk` and `atp*` compute the first attention softmax
  exactly. On the shipped organisms (`benchmarks/screen.py`, RESULTS.md) the saturated heads
  of shapes-qwen under STR, where atp finds 0.62 of what matters, are found by ig16 and atp*.
- Cancellation and strongly non-linear paths (BLIP's bidirectional text encoder under STR)
  defeat every estimator: there the worst top-5 overlap stays ~0.7. Attention changes carry
  much of those effects, but not only the first softmax a patch meets, which is all the QK fix
  recomputes; and with every attention pattern frozen, first order still misses a quarter of
  the cells that matter (`benchmarks/screen_frozen.py`): post-LayerNorm and MLP curvature.
  Integrating at each layer instead of at the inputs does not rank them either (0.70,
  `benchmarks/screen_layer_ig.py`), so it is not offered.
- So screen generously: `patch(..., screen=3 * k)` finds the k cells that matter where
  `screen=k` may miss some. Run end to end on every organism, corruption, metric and site
  (`benchmarks/screened_sweep.py`), the top 5 of `screen=15` held every material top-5 cell of
  the full sweep with atp* (atp+graddrop: at least 0.97, atp: 0.94, ig: 0.86, atp+qk: 0.79).
- Windows: restoring layers l and l+1 at once cuts the path from l through l+1, but the sum
  of per-layer estimates counts it twice; wide windows of the residual stream ("block") are
  overestimated. Rank cells within one window size (`screen` and `agreement` do).
- KL: KL(clean || x) is minimal, and quadratic, at the clean run. In the "noise" direction
  its gradient there is zero (every atp estimate equals the clean value; `attribute` warns);
  denoising, a first order misses half the curvature. Screen with LogProb or LogitDiff.
- A path can only be straight between runs that align: with a replacement phrase of another
  token count its end is not the other run, and `attribute` warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..errors import UserError
from ..models.adapter import Stack
from ..models.load import VLM
from ..presentation.progress import progress_bar
from ..results.dataset import Layout, describe
from .corruptions import Corruption
from .gradients import Moves, Passes, Terms, gradient_terms, queries_keys_moved
from .metrics import KL, Metric, Probability
from .planning import (
    Direction,
    Plan,
    checked_stack,
    lay_out,
    warn_if_corruption_did_nothing,
)
from .qk_fix import LayerScores, Reader, correction, readers
from .sites import Cell, Grid

__all__ = ["AttributionWarning", "attribute", "estimate"]

Method = Literal["atp", "ig", "atp+qk", "atp+graddrop", "atp*"]
METHODS: tuple[str, ...] = get_args(Method)
"""Every estimator `attribute(method=...)` and `patch(screen_method=...)` accept."""
QK_FIX = ("atp+qk", "atp*")
GRADDROP = ("atp+graddrop", "atp*")
STEPS = 4
"""Default path points of method="ig": on the organisms, 4 rank cells about as well as 8, 16 or 32
(`benchmarks/screen.py`)."""
FIX_CHUNK = 64
"""Cells whose QK fixes are computed at once (memory: heads x positions x chunk per copy)."""
PATH_TOLERANCE = 0.05
"""How far (a share of |clean - corrupt|) a path's end may be from the run it should reach."""


class AttributionWarning(UserWarning):
    """A combination of metric and direction whose first-order estimates carry no information."""


def attribute(
    vlm: VLM,
    samples: Sequence[Sample],
    *,
    corruption: Corruption,
    grid: Grid = Grid(),
    metric: Metric = Probability(),
    direction: Direction = "denoise",
    whole_answer: bool = False,
    method: Method = "atp",
    steps: int = STEPS,
    progress: bool = True,
) -> xr.Dataset:
    """Estimates of `vlmtrace.patch(...)` for every cell, in `patch`'s layout.

    `method="atp"` (the default) takes the gradient at the patched run; `"ig"` averages it
    over `steps` points of a path between the two runs; `"atp+qk"`, `"atp+graddrop"` and
    `"atp*"` are AtP*'s fixes (see the module docstring for what each costs and when each ranks
    better). One forward and one backward per sample, of 1 + k rows (atp), 1 + k (steps + 2)
    rows (ig) or 1 + k + L k rows (GradDrop, L the layers of every stack), k being the noise
    draws (1 without noise); the QK fix adds a forward-only pass of a row per (site, layer,
    head) and draw. `attrs["experiment"]` is "attribution" so an estimate is never mistaken
    for a measurement.
    """
    steps = _checked_steps(method, steps)
    stack_name, stack = checked_stack(vlm, samples, grid, direction, verb="attribute")
    if direction == "noise" and isinstance(metric, KL):
        warnings.warn(
            "KL(clean || x) has zero gradient at the clean run, so every noising estimate equals "
            "the clean value; use direction='denoise' or the LogProb / LogitDiff metric.",
            AttributionWarning,
            stacklevel=2,
        )
    plans, layout, attrs = lay_out(
        vlm,
        samples,
        stack_name,
        grid,
        corruption,
        metric,
        direction,
        whole_answer,
        "",
        {"experiment": "attribution", "attribution_method": method, "attribution_steps": steps},
    )
    ds = layout.empty(attrs)
    estimate(
        ds,
        layout,
        plans,
        vlm,
        stack,
        direction=direction,
        metric=metric,
        method=method,
        steps=steps,
        progress=progress,
    )
    warn_if_corruption_did_nothing(ds)
    return describe(ds.drop_vars("progress"))


def estimate(
    ds: xr.Dataset,
    layout: Layout,
    plans: Sequence[Plan],
    vlm: VLM,
    stack: Stack,
    *,
    direction: Direction,
    metric: Metric,
    method: Method = "atp",
    steps: int = STEPS,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> None:
    """Fill `ds` (from `layout.empty`) with estimates for the samples at `indices` (all: None).

    The engine's entry point: `patch(..., screen=k)` has its plans and layout already, and
    estimates only its own shard's samples.
    """
    steps = _checked_steps(method, steps)
    chosen = range(len(plans)) if indices is None else indices
    misses = []
    with progress_bar(progress, f"attributing {vlm.name}") as bar:
        task = bar.add_task("samples", total=len(chosen))
        for i in chosen:
            miss = _fill_sample(ds, layout, i, plans[i], vlm, stack, direction, metric, method, steps)
            misses.append(miss)
            bar.advance(task, 1)
    _warn_if_path_missed(ds, [i for i, miss in zip(chosen, misses, strict=True) if miss], direction)


def _fill_sample(
    ds: xr.Dataset,
    layout: Layout,
    sample: int,
    sample_plan: Plan,
    vlm: VLM,
    stack: Stack,
    direction: Direction,
    metric: Metric,
    method: str,
    steps: int,
) -> bool:
    """Estimate every cell of one sample's work list and write it, with the baselines, to `ds`.

    Returns whether the path's end missed the run it should reach (see `_warn_if_path_missed`).
    """
    prepared, cells = sample_plan.prepared, sample_plan.cells
    pairs = sorted(sample_plan.aligned.items())  # (clean position, corrupted position), unpadded
    pair_of = {clean: n for n, (clean, _) in enumerate(pairs)}
    wanted = sorted({(layer, cells[c].site) for c in sample_plan.work for layer in cells[c].layers})
    passes = Passes(
        steps=steps,
        skipped=_every_layer(vlm) if method in GRADDROP else (),
        scores=method in QK_FIX,
    )
    values, terms, miss, scores = gradient_terms(
        vlm, stack, prepared, pairs, wanted, direction, metric, passes
    )
    moves: Moves = {}
    if scores:
        # one patched row per (layer, site, head) that an attention reads first
        name = next(each for each, s in vlm.adapter.stacks.items() if s is stack)
        read = {layer for layer, _ in wanted if readers(vlm, name, layer)}
        groups = sorted(
            {
                (layer, cells[c].site, cells[c].head)
                for c in sample_plan.work
                for layer in cells[c].layers
                if layer in read
            },
            key=lambda group: (group[0], group[1], -1 if group[2] is None else group[2]),
        )
        moves = queries_keys_moved(vlm, stack, prepared, pairs, groups, direction)
    fixes = _single_position_fixes(scores, moves)
    clean, corrupt = float(values[0]), float(values[1:].mean())
    base = corrupt if direction == "denoise" else clean
    # The mean over noise draws commutes with the sums over layers and positions: take it first.
    mean_terms = {key: term.mean(1) for key, term in terms.items()}
    for c in sample_plan.work:
        cell = cells[c]
        copies = _cell_sum(cell, mean_terms, pair_of) + _cell_fix(cell, fixes, scores, moves, pair_of)
        ds[cell.site].values[layout.index(sample, cell)] = base + _combined(copies)
    ds["clean"].values[sample] = clean
    ds["corrupt"].values[sample] = corrupt
    ds["done"].values[sample] = True
    return miss > PATH_TOLERANCE * max(abs(clean - corrupt), 1e-6)


def _combined(copies: np.ndarray) -> float:
    """One cell's estimate from its gradient copies: the plain one, or GradDrop's score.

    GradDrop (Kramár et al. 2024, eq. 11) averages |estimate| over the copies that each skip
    one layer in the backward pass, dividing by L - 1: skipping the cell's own layer gives 0.
    A path that cancels another through some layer then shows up in the copy that skips it.
    The score keeps the sign of the plain estimate, so its effect reads like the others'.
    """
    if len(copies) == 1:
        return float(copies[0])
    dropped = np.abs(copies[1:]).sum() / max(len(copies) - 2, 1)
    return float(np.sign(copies[0]) * dropped) if copies[0] != 0 else float(dropped)


def _every_layer(vlm: VLM) -> tuple[tuple[str, int], ...]:
    """GradDrop's copies: every layer of every stack, one at a time."""
    return tuple((name, layer) for name in vlm.adapter.stacks for layer in range(vlm.shape.layers[name]))


def _checked_steps(method: str, steps: int) -> int:
    """Path points the method uses (0 but for ig), or a clear error for a bad option."""
    if method not in METHODS:
        raise UserError(
            f"method must be one of {', '.join(METHODS)} (see vlmtrace.engine.attribution), not {method!r}."
        )
    if method != "ig":
        return 0
    if steps < 1:
        raise UserError(f"method='ig' needs steps >= 1 path points, got {steps}.")
    return steps


def _warn_if_path_missed(ds: xr.Dataset, samples: list[int], direction: Direction) -> None:
    """Say so when a path's end is not the run it should be: its estimates lose completeness.

    The path moves embeddings at aligned positions only, so a replacement phrase of another
    length, a stack that the embeddings do not feed, or an image pair whose images differ in
    inputs besides their pixels (Mllama's aspect ratio and cross-attention mask for images of
    another shape) leaves its end short of the other run.
    """
    if not samples:
        return
    target = "clean" if direction == "denoise" else "corrupted"
    warnings.warn(
        f"for {len(samples)} sample(s) (first: {samples[0]}) the integrated-gradients path ends "
        f"more than {PATH_TOLERANCE:.0%} of the clean-corrupted gap away from the {target} run, "
        "usually because the phrases have different token counts, or the two images differ in an "
        "input the path does not move (an aspect ratio, a tile count); the estimates of those samples "
        "are less reliable. Prefer a same-length replacement (SymmetricTokenReplacement) and image "
        "pairs of one size.",
        AttributionWarning,
        stacklevel=3,
    )


def _cell_sum(cell: Cell, terms: Terms, pair_of: dict[int, int]) -> np.ndarray:
    """The first-order change of one cell per gradient copy: its terms over its layers and positions."""
    index = [pair_of[p] for p in cell.positions if p in pair_of]
    total = 0.0
    for layer in cell.layers:
        term = terms[(layer, cell.site)][:, index]
        total = total + (term[:, :, cell.head] if cell.head is not None else term).sum(1)
    return np.atleast_1d(total)


def _cell_fix(
    cell: Cell, fixes: dict, scores: dict[Reader, LayerScores], moves: Moves, pair_of: dict[int, int]
) -> np.ndarray:
    """The QK fix of one cell per gradient copy: over its layers and the attentions reading them.

    `fixes` holds each (layer, site, head)'s fix of every single position, computed at once;
    a cell of several positions is fixed jointly (its columns move together).
    """
    index = [pair_of[p] for p in cell.positions if p in pair_of]
    total = 0.0
    for layer in cell.layers:
        group = (layer, cell.site, cell.head)
        if group not in moves or not index:
            continue
        if len(index) == 1:
            total = total + fixes[group][index[0]]
            continue
        for reader, (dq, dk) in moves[group].items():
            joint = correction(scores[reader], dq, dk, torch.tensor([index]))
            total = total + joint[0].mean(-1).numpy()
    return np.atleast_1d(total)


def _single_position_fixes(scores: dict[Reader, LayerScores], moves: Moves) -> dict:
    """(layer, site, head) -> [pairs, copies]: the QK fix of patching each position alone."""
    fixes = {}
    for group, by_reader in moves.items():
        total = 0.0
        for reader, (dq, dk) in by_reader.items():
            singles = torch.arange(dk.shape[1])
            parts = [
                correction(scores[reader], dq, dk, singles[start : start + FIX_CHUNK, None])
                for start in range(0, len(singles), FIX_CHUNK)
            ]
            total = total + torch.cat(parts).mean(-1).numpy()
        fixes[group] = total
    return fixes
