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

Two estimators, chosen by `method`:

    atp   the gradient at the patched run (above): one row per run, exact for small changes.
    ig    integrated gradients (Sundararajan et al. 2017; EAP-IG, Hanna et al. 2024): the
          gradient averaged over `steps` points of a straight path between the two runs,
          `sum_cell mean_alpha grad m(x_alpha) . (a_clean - a_corrupt)`. The path runs through
          the embeddings, where corruptions act (`Adapter.embeddings`: token embeddings at
          aligned prompt positions, each image whole), so its points are real forwards of
          the same model and its end is the other run. Each point is one more row of the
          same forward and backward: 1 + k (steps + 2) rows instead of 1 + k.

What the first order misses, so read the estimates as a *screen*, not a measurement:
- Saturation: where P(answer) is near 0 or 1 the gradient at the run is small and says
  little about a large change (AtP*'s first failure mode, Kramár et al. 2024). `ig` samples
  the path where the metric moves. On the shipped organisms (`benchmarks/screen.py`) it
  raised the worst top-5 overlap of P(answer) screens from 0.62 to 0.72 and ranked the
  saturated heads of shapes-qwen right; with the logit difference `atp` ranked better, and
  its rank correlation over all cells is higher everywhere.
- Cancellation and strongly non-linear paths (BLIP's bidirectional text encoder under STR)
  defeat both: there the worst top-5 overlap is ~0.7. AtP*'s QK fix and GradDrop are not
  implemented.
- So screen generously: the exact top 5 were among atp's top 15 in at least 0.94 of cases on
  every organism and site (`agreement(..., candidates=15)`), so `patch(..., screen=3 * k)`
  finds the k cells that matter where `screen=k` may miss some.
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import nnsight
import numpy as np
import torch
import xarray as xr

from ..data.sample import Sample
from ..errors import UserError
from ..models.adapter import Stack
from ..models.load import VLM
from ..presentation.progress import progress_bar
from ..results.dataset import Layout, describe
from .alignment import align
from .corruptions import Corruption
from .forward import SEQUENCE_FIELDS, _activation, _noise, driver, envoy_at, stack_rows
from .layouts import interpolate, rows_view
from .metrics import KL, Metric, Probability
from .planning import (
    Direction,
    Plan,
    Prepared,
    baseline_edits,
    checked_stack,
    image_units,
    lay_out,
    warn_if_corruption_did_nothing,
    with_layer_kinds,
)
from .sites import HEAD_SITES, Cell, Grid

__all__ = ["AttributionWarning", "attribute", "estimate"]

Method = Literal["atp", "ig"]
STEPS = 4
"""Default path points of method="ig": on the organisms, 4 rank cells about as well as 8, 16 or 32
(`benchmarks/screen.py`)."""
PATH_TOLERANCE = 0.05
"""How far (a share of |clean - corrupt|) a path's end may be from the run it should reach."""

Terms = dict[tuple[int, str], np.ndarray]
"""(layer, site) -> grad . delta per noise draw and aligned position: [draws, pairs(, head)]."""


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
    over `steps` points of a path between the two runs (see the module docstring for when
    each ranks better). One forward and one backward per sample, of 1 + k rows (atp) or
    1 + k (steps + 2) rows (ig), k being the noise draws (1 without noise).
    `attrs["experiment"]` is "attribution" so an estimate is never mistaken for a measurement.
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
    ds = with_layer_kinds(layout.empty(attrs), vlm, stack_name)
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
            misses.append(_fill_sample(ds, layout, i, plans[i], vlm, stack, direction, metric, steps))
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
    steps: int,
) -> bool:
    """Estimate every cell of one sample's work list and write it, with the baselines, to `ds`.

    Returns whether the path's end missed the run it should reach (see `_warn_if_path_missed`).
    """
    prepared, cells = sample_plan.prepared, sample_plan.cells
    pairs = sorted(sample_plan.aligned.items())  # (clean position, corrupted position), unpadded
    pair_of = {clean: n for n, (clean, _) in enumerate(pairs)}
    wanted = sorted({(layer, cells[c].site) for c in sample_plan.work for layer in cells[c].layers})
    values, terms, miss = _gradient_terms(vlm, stack, prepared, pairs, wanted, direction, metric, steps)
    clean, corrupt = float(values[0]), float(values[1:].mean())
    base = corrupt if direction == "denoise" else clean
    # The mean over noise draws commutes with the sums over layers and positions: take it first.
    mean_terms = {key: term.mean(0) for key, term in terms.items()}
    for c in sample_plan.work:
        cell = cells[c]
        ds[cell.site].values[layout.index(sample, cell)] = base + _cell_sum(cell, mean_terms, pair_of)
    ds["clean"].values[sample] = clean
    ds["corrupt"].values[sample] = corrupt
    ds["done"].values[sample] = True
    return miss > PATH_TOLERANCE * max(abs(clean - corrupt), 1e-6)


def _checked_steps(method: str, steps: int) -> int:
    """Path points the method uses (0 for atp), or a clear error for a bad option."""
    if method not in ("atp", "ig"):
        raise UserError(
            f"method must be 'ig' (integrated gradients) or 'atp' (attribution patching), not {method!r}."
        )
    if method == "atp":
        return 0
    if steps < 1:
        raise UserError(f"method='ig' needs steps >= 1 path points, got {steps}.")
    return steps


def _warn_if_path_missed(ds: xr.Dataset, samples: list[int], direction: Direction) -> None:
    """Say so when a path's end is not the run it should be: its estimates lose completeness.

    The path moves embeddings at aligned positions only, so a replacement phrase of another
    length, or a stack that the embeddings do not feed, leaves its end short of the other run.
    """
    if not samples:
        return
    target = "clean" if direction == "denoise" else "corrupted"
    warnings.warn(
        f"for {len(samples)} sample(s) (first: {samples[0]}) the integrated-gradients path ends "
        f"more than {PATH_TOLERANCE:.0%} of the clean-corrupted gap away from the {target} run, "
        "usually because the phrases have different token counts; the estimates of those samples "
        "are less reliable. Prefer a same-length replacement (SymmetricTokenReplacement).",
        AttributionWarning,
        stacklevel=3,
    )


def _cell_sum(cell: Cell, terms: Terms, pair_of: dict[int, int]) -> float:
    """The first-order change of one cell: its terms over its layers and aligned positions."""
    index = [pair_of[p] for p in cell.positions if p in pair_of]
    total = 0.0
    for layer in cell.layers:
        term = terms[(layer, cell.site)][index]
        total += float((term[:, cell.head] if cell.head is not None else term).sum())
    return total


def _gradient_terms(
    vlm: VLM,
    stack: Stack,
    prepared: Prepared,
    pairs: list[tuple[int, int]],
    wanted: list[tuple[int, str]],
    direction: Direction,
    metric: Metric,
    steps: int,
) -> tuple[np.ndarray, Terms, float]:
    """One forward of the baseline (and path) rows and one backward of their metrics.

    Returns the metric of each baseline row (clean, then one per noise draw); for every wanted
    (layer, site), `grad . delta` at every aligned position pair, reduced over features (per
    head for head sites) inside the trace, so only small arrays leave it; and, with a path
    (`steps` > 0), how far its end row's metric is from the run it should reproduce.

    Rows, in order: clean, the k corrupted draws, then (path only) `steps` midpoints and one
    end point per draw: the patched input (corrupted for "denoise", clean for "noise") with
    its embeddings moved a fraction alpha of the way to the other run's (`_path_edits`).

    Gradients come from nnsight's backward trace (`with values.sum().backward():`, reading
    `.grad` of the activations captured in the forward, latest first). Rows of a batch do not
    interact, so the gradient of the summed metrics at a row is that row's own gradient.
    """
    k = prepared.pair.samples
    alphas = [(j + 0.5) / steps for j in range(steps)] + [1.0] if steps else []
    patched_input = "corrupt" if direction == "denoise" else "clean"
    inputs = ["clean"] + ["corrupt"] * k + [patched_input] * (len(alphas) * k)
    draws = [0, *range(k)] + [d for _ in alphas for d in range(k)]
    edits = baseline_edits(vlm, prepared, inputs, draws)
    batch = stack_rows(vlm, prepared.rows(inputs), prepared.widths)
    pad_clean, pad_corrupt = prepared.pad("clean", stack.sequence), prepared.pad("corrupt", stack.sequence)
    clean_at = torch.tensor([clean + pad_clean for clean, _ in pairs], dtype=torch.long)
    corrupt_at = torch.tensor([corrupt + pad_corrupt for _, corrupt in pairs], dtype=torch.long)
    # where the patched run's rows hold each pair, and which rows give the gradient
    patched_at = corrupt_at if direction == "denoise" else clean_at
    midpoints = torch.arange(1 + k, 1 + k + steps * k)  # [step * k + draw]
    path = _path_edits(vlm, prepared, inputs, alphas, direction) if steps else []
    n_heads = vlm.shape.heads[next(name for name, s in vlm.adapter.stacks.items() if s is stack)]
    answer_slice = prepared.answer_slice(vlm)
    answer, foil = prepared.answer, prepared.foil
    envoy = vlm.envoy
    layers = envoy_at(envoy, stack.layers)
    by_layer = {layer: [site for lay, site in wanted if lay == layer] for layer, _ in wanted}
    rows, width = batch[SEQUENCE_FIELDS[stack.sequence][0]].shape
    prompt_width = batch["input_ids"].shape[1]
    with torch.enable_grad(), _activation_gradients_only(vlm.model):
        with envoy.trace(fn=driver(vlm), **batch) as tracer:
            for name, hook in vlm.adapter.embeddings.items():  # in the order the model runs them
                noised = [plan for plan in edits.noise if plan.hook is hook]
                moves = [edit for edit in path if edit["embedding"] == name]
                if not noised and not moves:
                    continue
                live = _activation(envoy, hook)
                for plan in noised:
                    _noise(plan, live, rows, prompt_width)
                for edit in moves:
                    interpolate(
                        live, hook.layout, rows=rows, hook=hook.path, width=prompt_width, **edit["args"]
                    )
            if wanted:
                first = layers[0].input
                if not first.requires_grad:
                    first.requires_grad_(True)  # weights are frozen: the graph starts at the stack
            captured = []  # (key, activation), in the order the model runs them
            for layer in sorted(by_layer):
                for site, hook in stack.sites.items():
                    if site in by_layer[layer]:
                        captured.append(((layer, site), hook, _activation(layers[layer], hook)))
            logits = tracer.result[:, answer_slice]
            # A detached copy of the clean row as row 0: metrics that score against the clean run
            # (KL) then treat it as a constant, so each row's gradient is that of its own score.
            reference = torch.cat([logits[:1].detach(), logits])
            foil_ids = None if foil is None else foil.to(logits.device)
            scored = metric(reference, answer.to(logits.device), foil_ids)[1:]
            values = scored.detach().float().cpu().save()
            terms = nnsight.save({})
            if captured:
                with scored.sum().backward():
                    for key, hook, live in reversed(captured):  # autograd reaches them latest first
                        name = hook.path or "<layer>"
                        activation = rows_view(live, hook.layout, rows=rows, width=width, hook=name)
                        grad = rows_view(live.grad, hook.layout, rows=rows, width=width, hook=name)
                        clean_side = activation[:1, clean_at].float()
                        corrupt_side = activation[1 : 1 + k, corrupt_at].float()
                        delta = (
                            clean_side - corrupt_side if direction == "denoise" else corrupt_side - clean_side
                        )
                        if steps:  # the path's mean gradient, per draw: [k, pairs, features]
                            slope = (
                                grad[midpoints][:, patched_at]
                                .float()
                                .view(steps, k, *delta.shape[1:])
                                .mean(0)
                            )
                        elif direction == "denoise":  # at the corrupted rows, towards clean
                            slope = grad[1 : 1 + k, corrupt_at].float()
                        else:  # at the clean row, towards each corrupted draw
                            slope = grad[:1, clean_at].float()
                        product = slope * delta
                        if key[1] in HEAD_SITES:
                            product = product.view(*product.shape[:-1], n_heads, -1)
                        terms[key] = product.sum(-1).detach().cpu()
    values = values.numpy()
    miss = 0.0
    if steps:
        ends = values[1 + k + steps * k :]
        targets = np.full(k, values[0]) if direction == "denoise" else values[1 : 1 + k]
        miss = float(np.abs(ends - targets).max())
    return values[: 1 + k], {key: term.numpy() for key, term in terms.items()}, miss


def _path_edits(
    vlm: VLM, prepared: Prepared, inputs: list[str], alphas: list[float], direction: Direction
) -> list[dict]:
    """The interpolations that put each path row at its point between the two runs.

    The path runs through the embeddings, where corruptions act (`Adapter.embeddings`: token
    embeddings at aligned prompt positions, each image whole), so its end point is the other
    run itself wherever the two align. Path row `1 + k + j * k + d` is draw d at `alphas[j]`;
    it moves toward the clean row (denoise) or toward corrupted draw d (noise).
    """
    k = prepared.pair.samples
    moved = list(range(1 + k, 1 + k + len(alphas) * k))
    toward = [0 if direction == "denoise" else 1 + d for _ in alphas for d in range(k)]
    point = [a for a in alphas for _ in range(k)]
    edits = []
    for name, hook in vlm.adapter.embeddings.items():
        args: dict = {"moved_rows": moved, "toward_rows": toward, "alphas": point}
        if hook.layout.startswith("image_"):
            args["units"] = image_units(vlm, prepared.rows(inputs))
        if name == "tokens":
            aligned = align(prepared.pair.clean.segments("prompt"), prepared.pair.corrupt.segments("prompt"))
            pairs = sorted(aligned.pairs.items())
            clean = [c + prepared.pad("clean", "prompt") for c, _ in pairs]
            corrupt = [c + prepared.pad("corrupt", "prompt") for _, c in pairs]
            args["moved_pos"], args["toward_pos"] = (
                (corrupt, clean) if direction == "denoise" else (clean, corrupt)
            )
        edits.append({"embedding": name, "args": args})
    return edits


@contextmanager
def _activation_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Freeze the weights for one backward, restoring their flags after.

    Only gradients of activations are wanted. With trainable weights, backward would also
    compute and keep a gradient per parameter (as large as the model: 14 GB for a 7B LLaVA)
    and leave it in `param.grad`; frozen, it computes none, and the trace instead makes the
    stack's input require grad so the graph starts there.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
